"""Deployment of the app as a Hugging Face Space: the Spacefile, the bundle, the deploy.

Not part of the runtime package: a Space runs fm_demo/ and never ships this folder.
"""
