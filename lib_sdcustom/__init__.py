"""SD Customize: teach a Stable Diffusion checkpoint a new subject or style from a few pictures.

The package never imports the WebUI (`modules.*`): `scripts/` imports the host modules and hands them to `host/a1111.py`.
"""

import warnings

__version__ = "0.1.0"

# Importing any diffusers UNet imports every diffusers transformer, and some decorate methods with
# `torch.autocast("cuda", float32)` at class creation; without CUDA torch warns once per decorator. It
# says nothing about our training (which never autocasts to CUDA on a CPU), so it is not shown.
warnings.filterwarnings("ignore", message="CUDA is not available or torch_xla is imported. Disabling autocast",
                        category=UserWarning)
