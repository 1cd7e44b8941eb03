"""The exported classifier and the model MLflow serves."""
