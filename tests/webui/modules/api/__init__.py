"""Test double of the AUTOMATIC1111 stable-diffusion-webui 1.10 ``modules/api`` package."""
