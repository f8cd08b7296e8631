"""Eyes-defy-anemia TFDS builder (`eyes_defy_anemia_dataset_builder.Builder`) and its archive-reading helpers."""
