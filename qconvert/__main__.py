from qconvert.cli import main

raise SystemExit(main())
