# a package only so that setuptools maps this directory into the wheel as correctnet.configs (pyproject.toml)
