"""modelkit: checkpoint and adapter management for Stable Diffusion model files.

Importing the package is cheap: torch, diffusers and textual are imported only
by the functions that need them.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
