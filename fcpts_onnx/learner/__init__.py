"""The FCPTS learner: learned per-layer sparsity with joint reconstruction (../shared/METHOD.md).

Gong et al., "Fast and Controllable Post-training Sparsity: Learning Optimal Sparsity
Allocation with Global Constraint in Minutes", AAAI 2024.
"""
