"""Data layer: datasets of (prompt, token sequence) pairs.

melody    event vocabulary for monophonic melodies (MIDI/WAV/PNG helpers)
essen     `essen_folk` TFDS builder over music21's Essen corpus
imported  `imported_arrays` TFDS builder for user .npz arrays
meta      DatasetMeta: the schema (vocabularies from metadata)
registry  load_dataset(name, data_dir, **options): build, import or open a dataset
synthetic small made-up datasets for tests and benchmarks
pipeline  grain iterators yielding sharded global jax.Arrays
"""
