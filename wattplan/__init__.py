"""wattplan: an energy-aware control plane for LLM inference clusters."""

__version__ = "0.1.0"
