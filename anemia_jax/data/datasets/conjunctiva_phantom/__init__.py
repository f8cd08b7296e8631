"""conjunctiva_phantom: a procedurally generated stand-in for the Eyes-defy-anemia photos (see `phantom`)."""
