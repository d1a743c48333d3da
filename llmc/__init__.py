"""llmc: compile Hugging Face language models into verified inference artifacts."""

__version__ = "0.1.0"
