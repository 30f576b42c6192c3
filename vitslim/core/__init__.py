"""What every layer of vitslim may import: errors and exit codes (`errors`), atomic files and
digests (`files`), settings declared once (`settings`), precisions and parity tolerances
(`precision`), and the keys of what travels in an exported ONNX (`metadata`).

The core imports nothing else of vitslim and nothing heavy (numpy at most), so that pruning/,
export/ and deploy/ can share these facts without importing each other or the app layer.
"""
