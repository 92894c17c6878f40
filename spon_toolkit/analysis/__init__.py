"""The mathematics of the analyzers: pure functions on arrays, no model, no plugins.

- :mod:`.pca`: principal directions of activations, a bias's alignment with them and its random-direction null;
- :mod:`.stats`: bias statistics (excess kurtosis as scipy's Fisher definition) and permutation tests;
- :mod:`.cka`: linear CKA (Kornblith et al. 2019) and its shuffled-token null;
- :mod:`.shift`: relative hidden-state distance, recovery, KL to dense and top-1 agreement;
- :mod:`.probes`: cross-validated logistic-regression probes with a shuffled-label null.

Definitions follow the "Analyses" section of the project's design document.
"""
