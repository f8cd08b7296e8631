"""image_mask_folder: a TFDS builder for a folder of images and a folder of same-named binary masks."""
