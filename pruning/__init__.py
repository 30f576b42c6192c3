"""vitslim.pruning: the plan contract, the timm adapter, the masked reference, MAC accounting,
data and training, and the compression methods (`vitslim.pruning.methods`). Knows torch and timm;
imports nothing from export/ or deploy/."""
