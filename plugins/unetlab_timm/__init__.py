"""unetlab's timm plugin: any timm backbone with ``features_only`` as a U-Net encoder (``encoder: timm``).

Needs the optional extra ``pip install 'unetlab[timm]'`` (timm and safetensors); without it the
component is still listed and building it says how to install it.
"""
