import numpy as np, torch, os
os.environ.setdefault("HOME", "/tmp/exphome")
from torchvision import datasets
from spacenet.strategy.data import prepare_dataset
def load(name="MNIST"):
    root = prepare_dataset(name)
    cls = datasets.MNIST if name == "MNIST" else datasets.FashionMNIST
    tr = cls(root, train=True, download=True); te = cls(root, train=False, download=True)
    return (tr.data.numpy().reshape(-1, 784), tr.targets.numpy(), te.data.numpy().reshape(-1, 784), te.targets.numpy())
