from pkstrace.cli import main

raise SystemExit(main())
