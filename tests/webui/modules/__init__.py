"""Test double of the AUTOMATIC1111 stable-diffusion-webui ``modules`` package (1.10).

Mirrors: ``stable-diffusion-webui/modules/`` (the host package every extension imports from).

This is *not* the host. It is a compact, independently written stand-in that keeps the host's module
names, signatures and behaviour for the parts an always-on extension touches, so the extension can be
tested without a webui checkout, a text encoder or model weights.

How it is found: ``tests/conftest.py`` (owned by the lead) inserts ``tests/webui`` at the front of
``sys.path``, so ``import modules.script_callbacks`` resolves to ``tests/webui/modules/script_callbacks.py``.
Test files that may run on their own insert it themselves when it is missing.

Sampling path modules: ``shared``, ``shared_state``, ``errors``, ``devices``, ``script_callbacks``,
``prompt_parser``, ``sd_samplers_common``, ``sd_samplers_cfg_denoiser``, ``sd_samplers_kdiffusion`` (with the
few ``sd_schedulers`` it needs), ``sd_samplers_timesteps`` (with ``sd_samplers_timesteps_impl`` inline),
``sd_samplers`` and the test-only ``sd_models_double`` (tiny models, fake text encoder, refiner swap). Script/UI modules (``scripts``, ``processing``, ``infotext_utils``,
``ui_components``, ``api``, ...) are written separately.
"""
