"""The benchmark models' synthetic world and training (not part of the installed vidqa package).

world: the clips and questions; model/train: the bundled micro model; smol/train_smol/assemble: the
SmolLM2-135M accuracy-benchmark model. Run from a checkout (python -m microworld.train ...).
"""
