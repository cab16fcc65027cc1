from glob import glob

from setuptools import setup

package = "edgevlm_ros"

setup(
    name=package,
    version="0.1.0",
    packages=[package],
    data_files=[
        ("share/ament_index/resource_index/packages", [f"resource/{package}"]),
        (f"share/{package}", ["package.xml"]),
        (f"share/{package}/launch", glob("launch/*.launch.py")),
        (f"share/{package}/config", glob("config/*.yaml")),
    ],
    install_requires=["setuptools"],
    zip_safe=True,
    description="ROS 2 node for edgevlm: Extract->Think answers about the latest camera frame.",
    license="Apache-2.0",
    entry_points={"console_scripts": [f"node = {package}.node:main"]},
)
