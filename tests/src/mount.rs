//! Mount harness (see the mount tests).
