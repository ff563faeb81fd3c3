"""Double of Forge 2's ``backend`` package (lllyasviel/stable-diffusion-webui-forge, HEAD dfdcbab6): only the
patcher / sampling / attention contract PAG relies on."""
