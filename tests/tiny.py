"""The tiny model the CLI tests use, declared once: a 2-block, 32-wide ViT on digits upscaled to
16x16 pixels (16 patches of 4x4). The run trained from it is the `tiny_run` fixture (conftest.py)."""

TINY_KWARGS = ["img_size=16", "patch_size=4", "embed_dim=32", "depth=2", "num_heads=2", "num_classes=10"]
TINY_MODEL = ["--model", "deit_tiny_patch16_224", "--model-kwargs", *TINY_KWARGS]
