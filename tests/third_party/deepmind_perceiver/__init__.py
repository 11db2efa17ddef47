"""DeepMind's Perceiver (perceiver/ of google-deepmind/deepmind-research), vendored for the tests:
see README.md here."""
