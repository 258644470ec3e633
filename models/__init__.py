"""Reference architectures defined in the project (there is no torchvision build here).

Each module has factories usable as edgecomp SPECs, e.g. ``models.mobilenet_v2:digits_classifier``.
``python -m models.digits`` trains the digits classifiers on sklearn's bundled dataset.
"""
