"""The fuzz front end: seeded examples and workers (engine), reproducer files (corpus), reports, the zoo and the Hypothesis machine."""
