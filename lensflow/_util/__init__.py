"""Small shared helpers of every floor: one copy each (not public API).

``checks`` (argument validation), ``atomic`` (atomic output that respects the umask), ``seeds`` (every
SeedSequence recipe), ``plain`` (config/array → JSON types), ``hashing``, ``devices``, ``log``,
``progress`` (progress bars) and ``units`` (``ARCMIN``).
Nothing here imports Hydra or Lightning.
"""
