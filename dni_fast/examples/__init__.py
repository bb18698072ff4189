"""Runnable examples: ``python -m dni_fast.examples.<name>`` (``--help`` for options).

* ``quickstart``: backprop vs DNI vs cDNI on an MLP, then the speed of every backend (no data files needed);
* ``mnist_mlp``: MLP with a BackwardInterface after each hidden layer (update unlock), DNI and cDNI;
* ``mnist_fcn``: the paper's FCNs, 3 to 6 layers, a DNI after every layer;
* ``mnist_cnn``: CNN with a custom convolutional synthesizer;
* ``mnist_full_unlock``: complete unlock with a BidirectionalInterface;
* ``ptb_lm``: LSTM language model with truncated BPTT, with and without synthetic gradients (word or char level);
* ``copy_task``: the copy task; the longest sequence learned under truncation, with and without DNI.

Every example takes ``--quick`` (seconds, for CI), ``--log runs/NAME.json`` (read by
``scripts/make_results.py``), ``--seed``, ``--backend`` and ``--data``. Without the
data files (see ``dni_fast.examples.data``) the MNIST examples use scikit-learn's digits and the
language models a generated corpus.
"""
