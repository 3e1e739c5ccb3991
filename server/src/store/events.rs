//! The events a change makes, from its ops and the tree before and after them, split into
//! what the owner's sessions and what others' may see (an entry moved out of others'
//! sight is removed for them, one moved into it appears).

use sharefs_protocol::Event;

use super::tree::{Node, Op, Tree};
use super::Published;

/// What each op's entry was before the change, and whether others could see it then.
pub type Before = Vec<(Option<Node>, bool)>;

/// Takes what [`of`] needs of `tree` before `ops` are applied to it.
pub fn before(tree: &Tree, ops: &[Op]) -> Before {
    ops.iter()
        .map(|op| {
            let id = match op {
                Op::Put(n) => n.id,
                Op::Remove { id } => *id,
            };
            (tree.get(id).cloned(), tree.others_may_see(id))
        })
        .collect()
}

/// The events of `ops`, now applied to `tree`.
pub fn of(tree: &Tree, owner: &str, ops: Vec<Op>, before: Before) -> Vec<Published> {
    let mut events = Vec::with_capacity(ops.len());
    for (op, (prior, was_visible)) in ops.into_iter().zip(before) {
        match op {
            Op::Put(node) => {
                let from = prior
                    .filter(|p| p.parent != node.parent || p.name != node.name)
                    .map(|p| p.place());
                let visible = tree.others_may_see(node.id);
                let others = match (&from, was_visible, visible) {
                    (_, _, true) => Some(Event::Changed {
                        owner: owner.to_string(),
                        file: node.info(owner),
                        from: from.clone().filter(|_| was_visible),
                    }),
                    (Some(from), true, false) => Some(Event::Removed {
                        owner: owner.to_string(),
                        id: node.id,
                        parent: from.parent,
                        name: from.name.clone(),
                    }),
                    _ => None,
                };
                events.push(Published {
                    owner: Event::Changed {
                        owner: owner.to_string(),
                        file: node.info(owner),
                        from,
                    },
                    others,
                });
            }
            Op::Remove { id } => {
                let Some(prior) = prior else { continue };
                let event = Event::Removed {
                    owner: owner.to_string(),
                    id,
                    parent: prior.parent,
                    name: prior.name,
                };
                events.push(Published {
                    others: was_visible.then(|| event.clone()),
                    owner: event,
                });
            }
        }
    }
    events
}
