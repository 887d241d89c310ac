# userlab: two commands set everything up on a fresh machine.
#   make demo   build demo data, train USER and a VSE++ baseline, evaluate, draw figures;
#               then train what lessons 04-05 need (LESSONS=0 skips)
#   make test   run every test (unit, notebooks in smoke mode, browser, the course release)
#   make course write the student release of the notebooks (no solutions) to course/release/
#   make book   execute the notebooks (reusing make demo's checkpoints) into a static site, build/book/site
PY      ?= python3
VENV    := .venv
VPY     := $(VENV)/bin/python
STAMP   := $(VENV)/.installed

.PHONY: demo test course book install clean-venv

$(STAMP): pyproject.toml
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install --upgrade pip
	# torch first: these releases lie on local disk; a newer one downloads gigabytes
	$(VPY) -m pip install torch==2.14.1 torchvision==0.29.1
	$(VPY) -m pip install -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VPY) -m userlab demo
ifneq ($(LESSONS),0)
	# train, once, what lessons 04 and 05 train (cached by config in runs/cache): afterwards every
	# lesson runs in seconds. `make demo LESSONS=0` skips this (~15 min on 2 CPU cores).
	$(VPY) scripts/build_book.py --only 04 05
endif

test: $(STAMP)
	bash scripts/setup_browser.sh
	$(VPY) scripts/make_course.py --out course/release
	USERLAB_SMOKE=1 $(VPY) -m pytest --nbmake --nbmake-timeout=900 tests notebooks course/release/notebooks

course: $(STAMP)
	$(VPY) scripts/make_course.py --out course/release

book: $(STAMP)
	$(VPY) scripts/build_book.py $(BOOK_ARGS)

clean-venv:
	rm -rf $(VENV)
