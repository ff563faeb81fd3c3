"""Test double of the 1.8+ alias ``modules.generation_parameters_copypaste`` -> ``modules.infotext_utils``.

The host sets ``sys.modules['modules.generation_parameters_copypaste']`` inside ``infotext_utils``;
this file makes a plain ``import modules.generation_parameters_copypaste`` work before that import too.
"""

import sys

from modules import infotext_utils

sys.modules[__name__] = infotext_utils
