"""Model definitions. Import :mod:`zhilu.models.presets` without torch; :mod:`zhilu.models.gpt` needs it."""
