"""peftcli: parameter-efficient fine-tuning of Hugging Face models from declarative YAML recipes."""

__version__ = "0.1.0"
