"Package setup: metadata from settings.ini, the version from kdcb/__init__.py; nothing is repeated here."
import re
from configparser import ConfigParser
from pathlib import Path
from setuptools import find_packages, setup

here = Path(__file__).parent
cfg = ConfigParser(delimiters=['='])
cfg.read(here/'settings.ini', encoding='utf-8')
cfg = cfg['DEFAULT']
lib = cfg['lib_name']
version = re.search(r'^__version__\s*=\s*[\'"]([^\'"]+)[\'"]', (here/lib/'__init__.py').read_text(), re.M).group(1)
licenses = {'apache2': ('Apache-2.0', 'Apache Software License')} # SPDX name, trove classifier
statuses = dict(enumerate(['Planning', 'Pre-Alpha', 'Alpha', 'Beta', 'Production/Stable', 'Mature', 'Inactive'], 1))

setup(
    version=version, description=cfg['description'],
    long_description=(here/'README.md').read_text(encoding='utf-8'), long_description_content_type='text/markdown',
    author=cfg['author'], author_email=cfg['author_email'], license=licenses[cfg['license']][0],
    keywords=cfg['keywords'].split(),
    packages=find_packages(include=[lib, lib+'.*']),
    install_requires=cfg['requirements'].split(),
    extras_require={'demo': cfg['demo_requirements'].split(), 'hf': cfg['hf_requirements'].split(),
                    'dev': cfg['demo_requirements'].split() + cfg['dev_requirements'].split()},
    entry_points={'console_scripts': cfg['console_scripts'].split(), 'nbdev': [f'{lib}={lib}._modidx:d']},
    classifiers=[f"Development Status :: {cfg['status']} - {statuses[int(cfg['status'])]}",
                 'Intended Audience :: Developers', f"Natural Language :: {cfg['language']}",
                 f"License :: OSI Approved :: {licenses[cfg['license']][1]}", 'Programming Language :: Python :: 3.11'],
    zip_safe=False)
