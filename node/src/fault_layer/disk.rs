//! A slow disk: the store hook that makes every write and fsync of the data dir wait as the
//! fault settings say. The store runs its I/O on blocking threads in konord, so the wait holds
//! up what a slow device would hold up (acks wait for their fsync) and nothing else.

use std::io;
use std::path::Path;
use std::sync::Arc;

use super::FaultLayer;
use crate::storage::store::{StorageHook, WriteFault};

/// The hook, over the layer's settings.
#[derive(Debug)]
pub struct SlowDisk {
    layer: Arc<FaultLayer>,
}

impl SlowDisk {
    /// A hook reading `layer`'s settings at each operation.
    pub fn new(layer: Arc<FaultLayer>) -> SlowDisk {
        SlowDisk { layer }
    }
}

impl StorageHook for SlowDisk {
    fn before_write(&self, _path: &Path, _offset: u64, _bytes: &[u8]) -> Result<(), WriteFault> {
        let wait = self.layer.settings().write_delay;
        if !wait.is_zero() {
            std::thread::sleep(wait);
        }
        Ok(())
    }

    fn before_sync(&self, _path: &Path) -> io::Result<()> {
        let wait = self.layer.settings().fsync_delay;
        if !wait.is_zero() {
            std::thread::sleep(wait);
        }
        Ok(())
    }
}
