"""Double of reForge's ``ldm_patched`` (Panchovix/stable-diffusion-webui-reForge main 3b56b268): the patcher/sampling contract."""
