"""Default schedules for what MetaSchedule tuning does not reach (cpu.py)."""
