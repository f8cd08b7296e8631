"""Data: the TFDS builders, the device-resident input pipeline, augmentation, patient-level splits and input
normalisation. Imports the research API and utils only."""
