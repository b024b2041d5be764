//! The latest task, persisted so that a restarted coordinator still shows
//! what happened (written atomically at the start and end of each task).

use std::path::PathBuf;

use super::task::{TaskState, TaskStatus};

pub struct TaskStore {
    path: PathBuf,
}

impl TaskStore {
    pub fn new(data_dir: &std::path::Path) -> TaskStore {
        TaskStore {
            path: data_dir.join("tasks").join("latest.json"),
        }
    }

    /// The last saved task. One saved as running was cut short by a
    /// restart: its node jobs were cancelled when our sessions dropped.
    pub fn load(&self) -> Option<TaskStatus> {
        let text = match std::fs::read(&self.path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
            Err(e) => {
                tracing::warn!(path = %self.path.display(), "cannot read saved task: {e}");
                return None;
            }
        };
        match serde_json::from_slice::<TaskStatus>(&text) {
            Ok(mut task) => {
                if task.status == TaskState::Running {
                    task.finish(TaskState::Cancelled, "the coordinator restarted");
                }
                Some(task)
            }
            Err(e) => {
                tracing::warn!(path = %self.path.display(), "ignoring unreadable saved task: {e}");
                None
            }
        }
    }

    pub fn save(&self, task: &TaskStatus) {
        if let Err(e) = self.try_save(task) {
            tracing::warn!(path = %self.path.display(), "cannot save task: {e}");
        }
    }

    fn try_save(&self, task: &TaskStatus) -> std::io::Result<()> {
        crate::files::write_atomically(&self.path, &serde_json::to_vec_pretty(task)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::coordinator::task::{NodeState, NodeStatus};

    #[test]
    fn a_task_saved_while_running_loads_as_cancelled() {
        let dir = tempfile::tempdir().unwrap();
        let store = TaskStore::new(dir.path());
        assert_eq!(store.load(), None);
        let per_node = [("a".to_string(), NodeStatus::new(NodeState::Started))].into();
        let task = TaskStatus::new("t".into(), "a".into(), per_node);
        store.save(&task);
        let loaded = store.load().unwrap();
        assert_eq!(loaded.status, TaskState::Cancelled);
        assert_eq!(loaded.per_node["a"].status, NodeState::Cancelled);
        assert_eq!(loaded.task_id, "t");
    }
}
