"""SD Customize: teach a Stable Diffusion checkpoint a new subject or style from a few pictures.

The package never imports the WebUI (`modules.*`); host glue lives in `scripts/` and `host_a1111.py`.
"""

__version__ = "0.1.0"
