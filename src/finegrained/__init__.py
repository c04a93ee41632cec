"""Fine-grained image classification by transfer learning: data, models, training, evaluation."""
__version__ = "0.1.0"
