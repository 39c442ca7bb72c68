"""Data layer: datasets of (prompt, token sequence) pairs.

melody    event vocabulary for monophonic melodies (MIDI/WAV/PNG helpers)
essen     `essen_folk` TFDS builder over music21's Essen corpus
imported  `imported_arrays` TFDS builder for user .npz arrays
meta      DatasetMeta (vocabularies from metadata) and load_dataset()
pipeline  grain iterators yielding sharded global jax.Arrays
"""
