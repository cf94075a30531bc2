"""Using a trained model: ``unetlab predict`` on new images and ``unetlab export`` to torch.export / ONNX.
"""
