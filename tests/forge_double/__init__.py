"""Doubles of the Forge 2 (``forge2/backend``) and reForge (``reforge/ldm_patched``) UNet patcher contracts.

Each root (``forge2``, ``reforge``) is put on ``sys.path`` by itself so host detection sees one host.
``unet_walk`` is the transformer_options-aware UNet forward both doubles run over a real ldm UNet.
"""
