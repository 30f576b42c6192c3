"""Size limits, declared once: the largest values vitslim accepts from a command line or a file,
checked before any work. Each is far above real use and far below what would exhaust a machine
(a batch of a billion images would be allocated before anything failed); a refusal names it."""

MAX_BATCH = 65536  # images per batch: bench, compare, gate, engine profiles, kits
MAX_IMAGE_SIDE = 4096  # pixels per side of a model's input (timm's img_size)
MAX_WORKSPACE_MB = 1 << 20  # TensorRT's workspace limit: 1 TiB
MAX_MESSAGE_CHARS = 1000  # an error message as the CLI prints it (a file can make it arbitrarily long)
