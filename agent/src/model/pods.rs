//! The pod listeners `server::pods` keeps, by broker id.

use super::Model;
use super::views::PodListener;
use crate::locks::{read, write};

impl Model {
    /// The pod listeners now, by broker id.
    pub fn pod_listeners(&self) -> std::collections::HashMap<String, PodListener> {
        read(&self.pod_listeners).clone()
    }

    pub fn pod_listener(&self, id: &str) -> Option<PodListener> {
        read(&self.pod_listeners).get(id).cloned()
    }

    pub fn set_pod_listeners(&self, all: std::collections::HashMap<String, PodListener>) {
        *write(&self.pod_listeners) = all;
    }
}
