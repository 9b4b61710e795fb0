"""cellmorph: classify cellular morphological changes in microscopy images by transfer learning."""

from cellmorph.errors import CellmorphError

__version__ = "0.1.0"
__all__ = ["CellmorphError", "__version__"]
