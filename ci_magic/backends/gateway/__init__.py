"""The gateway backend: sandboxes are kernels on Jupyter Kernel Gateway or Enterprise Gateway.

``backend.py`` implements the Backend protocol, ``client.py`` the gateway's REST and WebSocket
APIs, ``_kernel_io.py`` the file operations run inside the kernel, and ``kernelspec.py`` the
kernelspec (and its installer) that starts gateway kernels through ci-magic's sandbox launcher.
"""
