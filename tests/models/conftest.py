import torch

# Two cores shared by several processes: intra-op threads only contend (measured 40x slower).
torch.set_num_threads(1)
