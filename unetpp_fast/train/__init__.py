"""The application layer: data, losses, metrics, training and evaluation jobs.

data.py            DSB2018 (Kaggle and merged layouts) loading and splits
synthetic_data.py  a small generated nuclei set for tests and demos
losses.py          BCE + Dice (Eq. 2 of the paper), over deep-supervision heads
metrics.py         IoU and Dice
training.py        the training job: recipe, checkpoints, resume
evaluation.py      evaluation per pruning level and prediction
"""
