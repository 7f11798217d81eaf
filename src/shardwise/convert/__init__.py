"""Convert a dense model to tensor parallelism by a plan: {module-name pattern: style}."""

from . import plans as plans
from .apply import *  # noqa: F403
